"""`python -m mtlrun.bench`: runs the bench's command line."""

from mtlrun.bench.cli import main

if __name__ == "__main__":
    main()
