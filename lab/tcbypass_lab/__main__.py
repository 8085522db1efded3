"""`python -m tcbypass_lab`: the same as the tcbypass-lab command."""

from .cli import main

main()
