"""`python -m weavelm.cli ...` (how torchrun starts it: `torchrun ... -m weavelm.cli serve ...`)."""
from weavelm.cli.main import main

if __name__ == "__main__":
    main()
