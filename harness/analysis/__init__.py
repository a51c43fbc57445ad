"""What the records say: calibration tables, regression checks, reports and tables.

`calibrate` fits the device overheads per environment (`vramlab fit`), `check` compares two sets
of records (`vramlab check`), `report` scores predictions and rules of thumb (`vramlab report`),
`frame` turns records into one row per experiment with columns named by source (`vramlab results`),
and `stats` holds the error statistics they share.
"""
