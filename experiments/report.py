"""Gather a sweep into a table (markdown, CSV) and plots:  python experiments/report.py multirun/DATE/TIME"""

import sys

from manualbp.report import main_cli

if __name__ == "__main__":
    sys.exit(main_cli())
