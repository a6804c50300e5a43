"""Offline jobs (`reranker score`): input records -> windows of scores -> crash-safe outputs.

Read in this order:
- `records.py`: what readers yield: a `Unit` (one query and its documents) or a `Reject`;
- `readers.py`: JSONL, Parquet and BEIR folders -> units and rejects, streamed;
- `validate.py`: the query-id rule (one contiguous run of records per query id, one text,
  each (query, doc) pair once), between the readers and the job, for every format;
- `paths.py`: the job's files: no output aliases an input or another output, only regular
  files are written, and a lock keeps a second job off an output;
- `images.py`: image documents: read (regular files only), decoded and sized per window, bad ones rejected alone;
- `job.py`: the loop: windows tokenised ahead, scored, written and checkpointed behind;
- `resume.py`: the job's checkpoint: what was consumed and written, and what it was computed from;
- `writers.py`: JSONL, Parquet, TREC and rejects files that resume exactly after a crash;
- `hidden.py`: `--save-hidden`: each pair's hidden state (.npy + ids index), with the same protocol;
- `devices.py`: one backbone process per GPU, fed windows from the same job;
- `progress.py`: a tqdm bar on a terminal, log lines elsewhere;
- `ray_data.py`: the scorer as a Ray Data callable class (one `Reranker` per actor, optional Ray);
- `ray_job.py`: `--engine ray`: the same windows on a Ray cluster, written per shard, resumable by shard;
- `run.py`: `run_job(spec, settings, ...)`, the entry of both engines: one preflight (model resolved,
  `bf16` decided, fingerprint, paths checked), the lock, the run; returns the summary (the CLI prints it).
"""
