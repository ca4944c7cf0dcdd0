"""Task files: the one owner of their format (write, check, read, merge)."""
