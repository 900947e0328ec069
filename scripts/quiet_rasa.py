"""``rasa`` with ``PYTHONWARNINGS=ignore`` honoured, for the demo.

Importing Sanic (which Rasa does) adds ``filterwarnings("once",
DeprecationWarning)`` in front of the filters Python set up from
``PYTHONWARNINGS``, so ~20 lines of other libraries' deprecation notices
would print before the chat starts. This imports Sanic first, puts the
environment's filters back in front (and with plain ``ignore`` shows no
warning at all), then runs Rasa's own command line.
Usage: ``python scripts/quiet_rasa.py <rasa arguments>``.
"""
import os
import sys
import warnings

import sanic  # noqa: F401  (imported for its side effect on the warning filters)

specs = [s for s in os.environ.get("PYTHONWARNINGS", "").split(",") if s]
for spec in reversed(specs):
    warnings._setoption(spec)  # what `python -W spec` does, at the front again
if specs == ["ignore"]:
    # Other imports insert filters of their own later (matplotlib's pyparsing
    # notices still got through): "ignore" means nothing is shown at all.
    warnings.showwarning = lambda *args, **kwargs: None

from rasa.__main__ import main  # noqa: E402  (after the filters, on purpose)

if __name__ == "__main__":
    sys.argv[0] = "rasa"
    sys.exit(main())
