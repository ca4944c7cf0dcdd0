"""What the commands share to run: the command line (``TapsCLI``), run folders and their locks,
input checks, SIGTERM handling and atomic checkpoints, trained tasks from a checkpoint or task
files, and the offline default's weights."""
