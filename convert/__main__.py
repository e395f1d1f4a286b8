"""`python -m convert SRC_DIR|SRC.gguf OUT.gguf --quant q8_0` — the same command as `localmoe convert`."""
from localmoe.cli import main

if __name__ == "__main__":
    main(["convert", *__import__("sys").argv[1:]])
