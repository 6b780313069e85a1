"""`python -m camserve.server`: the same as the `camserve-server` command."""

from camserve.server.app import main

if __name__ == "__main__":
    raise SystemExit(main())
