"""`python -m dagcli ...` (also what `accelerate launch -m dagcli train ...` runs)."""

from dagcli.cli import main

if __name__ == "__main__":
    main()
