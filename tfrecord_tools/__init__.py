"""Tools that turn audio into the log-mel shards the trainer reads, and check them.

``python -m tfrecord_tools.build``: audio (folder, CSV, AudioSet, FSD50K) -> shards.
``python -m tfrecord_tools.inspect``: parse every record, print counts and problems.
"""
