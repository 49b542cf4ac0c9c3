"""``python -m nfm_cli`` (also what ``torchrun -m nfm_cli`` runs)."""
from nfm_cli.cli import main

if __name__ == "__main__":
    main()
