"""The end-to-end demo's own parts: an audio corpus made on the spot and the final report.

The demo itself is ``scripts/demo.sh``: every stage there is one documented command.
"""
