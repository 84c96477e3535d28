"""`python -m fastclass` runs the command line."""
from fastclass.cli import main

main()
