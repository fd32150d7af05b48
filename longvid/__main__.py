"""``python -m longvid``: the command line, e.g. one batch worker per GPU with
``torchrun --nproc_per_node 8 -m longvid batch prompts.jsonl --recipe ... --out ...``."""

from longvid.cli import main

main()
