"""Running one job: the command line, the run directory and its lock, the saved state, stop signals, and the processes of a run or sweep."""
