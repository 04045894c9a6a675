"""XManager launcher for mwmae (local runs, Vertex AI, TPU): arrives with the launch tooling.

Until then, launch with ``python -m mwmae.train --config CONFIG --workdir WORKDIR``.
"""

if __name__ == "__main__":
    raise SystemExit("xm_launcher.py: the XManager launcher is not implemented yet; run "
                     "`python -m mwmae.train --config CONFIG --workdir WORKDIR` directly")
