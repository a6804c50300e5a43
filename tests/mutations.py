"""Mutation check: each one-line mutation of the library below must make the tests named beside it fail.

Run on demand and before a release (not part of the suite; it runs pytest once per mutation):

    python tests/mutations.py              # every mutation
    python tests/mutations.py --list       # names, files and tests
    python tests/mutations.py head-logit-shift ctrl-c-ignored

Each mutation is applied to a fresh copy of the working tree (tracked and untracked files, never the
tree itself), whose tests then run against the mutated copy (`PYTHONPATH`, also for the `python -m
reranker` processes the tests start). A mutation is "caught" when pytest fails; "survived" when it
passes, which means the suite would not notice that defect. A mutation whose original text is no
longer in the file (or occurs more than once) is "stale": the code moved, update the entry here.
The exit status is 0 only when every mutation was caught.

A new guarantee gets a mutation here: the smallest edit that breaks it, and the tests that must catch it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    original: str
    mutated: str
    tests: tuple[str, ...]
    why: str


MUTATIONS = [
    # The backbone against transformers (tests/oracle.py's tolerances).
    Mutation("f32-reference-off", "reranker/engine/backbone.py",
             'reference = self.metadata("general.file_type") == str(llama_cpp.LLAMA_FTYPE_ALL_F32)',
             "reference = False",
             ("tests/engine/test_backbone.py", "tests/api/test_paths_oracle.py"),
             "F32 GGUFs get an F16 KV cache and flash attention (~1.4e-4 relative error instead of ~1e-6)"),
    Mutation("deterministic-no-score-token", "reranker/engine/backbone.py",
             "out[i] = self._hidden(0, self._decode_alone(ids))",
             "out[i] = self._hidden(0, self._decode_alone(ids[:-1]))",
             ("tests/engine/test_deterministic.py", "tests/api/test_paths_oracle.py"),
             "deterministic mode reads the state before the scoring token"),
    Mutation("chunks-of-n-batch", "reranker/engine/backbone.py",
             "size = _equal_piece(len(ids), self.n_batch)",
             "size = self.n_batch",
             ("tests/engine/test_n_batch.py",),
             "a prompt just over n_batch ends in a chunk of a few tokens, whose CPU attention rounds queries to F16"),
    Mutation("image-pieces-of-n-batch", "reranker/engine/backbone.py",
             "chunks.append((seq, c, _equal_piece(c.remaining, budget)))",
             "chunks.append((seq, c, min(c.remaining, budget)))",
             ("tests/engine/test_segments.py",),
             "an image just over n_batch rows ends in a piece of a few rows, whose CPU attention rounds queries to F16"),
    Mutation("n-batch-default-not-by-device", "reranker/engine/backbone.py",
             "n_batch = min(n_batch or (N_BATCH_GPU if on_gpu else N_BATCH_CPU), n_ctx)",
             "n_batch = min(n_batch or N_BATCH_GPU, n_ctx)",
             ("tests/engine/test_n_batch.py",),
             "the CPU decodes 2048-token calls, whose attention visits every masked cell of the call"),
    # One path: the load settings are checked once, for every caller.
    Mutation("settings-bf16-without-fast", "reranker/settings.py",
             "if self.bf16 and not self.fast:",
             "if False:",
             ("tests/api/test_settings.py",),
             "bf16=True with fast=False loads without the re-encode it asked for, silently"),
    # The head against the checkpoint's score MLP and the upstream numpy formula.
    Mutation("head-logit-shift", "head/model.py",
             "return z.to(torch.promote_types(z.dtype, torch.float32)) - self.logit_bias",
             "return z.to(torch.promote_types(z.dtype, torch.float32)) - self.logit_bias - 0.004",
             ("tests/torch_head/test_head.py", "tests/api/test_api.py"),
             "the module's logits are 0.004 low"),
    Mutation("fused-head-logit-shift", "head/fused.py",
             "b2 = head.fc2.bias.detach().cpu().double() - float(head.logit_bias)",
             "b2 = head.fc2.bias.detach().cpu().double() - float(head.logit_bias) - 0.004",
             ("tests/torch_head/test_head.py", "tests/jobs/test_hidden.py"),
             "the fused inference path (score_embeddings, reranker head) has its folded bias 0.004 low"),
    Mutation("head-cast-rounds-logit-bias", "head/model.py",
             "        if self.logit_bias.dtype != bias.dtype:\n",
             "        if False:\n",
             ("tests/torch_head/test_head.py::test_dtype_casts_keep_the_logit_bias_exact",),
             "head.bfloat16() rounds the logit bias to 2.65625 for good, and save_npz writes it"),
    Mutation("checkpoint-logit-bias-ignored", "head/hf_checkpoint.py",
             "            logit_bias = _stored_bias(os.fspath(source))\n",
             "            pass\n",
             ("tests/torch_head/test_head.py::test_save_checkpoint_keeps_a_custom_logit_bias",),
             "a head saved by save_checkpoint with its own logit bias loads back with 2.65"),
    Mutation("head-weights-unchecked", "head/model.py",
             "        weights.check()\n",
             "",
             ("tests/torch_head/test_head.py::test_head_weights_built_by_hand_are_checked",),
             "hand-built HeadWeights broadcast a (1,) bias over H or carry NaN into every score"),
    Mutation("streaming-copies-whole-array", "head/streaming.py",
             "        return _GatheredRows(data, lead), lead\n",
             "        pass\n",
             ("tests/torch_head/test_head.py::test_score_embeddings_streams_layouts_no_view_can_flatten",),
             "a Fortran-order .npy is copied whole into memory before its first chunk is scored"),
    # The command line and jobs.
    Mutation("rerank-empty-query", "reranker/cli/rerank.py",
             "ranked = reranker.rank(query, docs,",
             'ranked = reranker.rank("", docs,',
             ("tests/cli/test_cli.py",),
             "`reranker rerank` scores every document against an empty query"),
    Mutation("ctrl-c-ignored", "reranker/cli/score.py",
             'Rerun the same command to resume.", file=sys.stderr)\n        raise\n',
             'Rerun the same command to resume.", file=sys.stderr)\n        return\n',
             ("tests/jobs/test_job.py::test_ctrl_c_stops_cleanly_and_resumes",),
             "Ctrl-C ends `reranker score` with status 0, as if the job were complete"),
    Mutation("job-swallows-ctrl-c", "reranker/jobs/run.py",
             "raise JobInterrupted(job.stats.pairs) from None",
             "stats = job.stats",
             ("tests/jobs/test_job.py::test_ctrl_c_stops_cleanly_and_resumes",),
             "run_job treats Ctrl-C as the end of the input and writes a summary of a complete job"),
    Mutation("head-not-in-fingerprint", "reranker/jobs/job.py",
             '"head": file_fingerprint(head_path, whole=True) if head_path else None',
             '"head": None',
             ("tests/jobs/test_job.py::test_resume_with_another_head_is_refused_naming_the_head",),
             "a job resumed with another head mixes two heads' scores in one output"),
    Mutation("resume-appends-after-uncommitted", "reranker/jobs/writers.py",
             "        self._f.truncate(size)\n        self._f.seek(size)\n",
             "        self._f.seek(0, 2)\n",
             ("tests/jobs/test_io.py::test_resume_equals_single_pass_text_formats",),
             "a resumed job writes after the killed run's uncommitted lines (duplicates, a torn line)"),
    Mutation("full-disk-no-hint", "reranker/jobs/paths.py",
             'fix = {errno.ENOSPC: "free some space, then rerun the same command to resume",\n',
             "fix = {\n",
             ("tests/jobs/test_job_safety.py",),
             "a full disk stops the job without saying how to go on"),
    Mutation("unwritable-folder-no-hint", "reranker/jobs/paths.py",
             '               errno.EACCES: "the folder must be writable: fix its permissions or choose another -o",\n',
             "",
             ("tests/jobs/test_job_safety.py::test_unwritable_output_folder_is_one_line",),
             "an unwritable output folder is not named as the problem"),
    Mutation("unreadable-file-accepted", "reranker/gguf/header.py",
             "if stat.S_ISREG(st.st_mode) and os.access(p, os.R_OK):",
             "if stat.S_ISREG(st.st_mode):",
             ("tests/api/test_hardening.py::test_unreadable_gguf_and_head",),
             "an unreadable GGUF or head fails deep inside llama.cpp or numpy instead of in one line"),
    # The server.
    Mutation("serve-ignores-api-key-env", "reranker/cli/serve.py",
             "api_key=args.api_key or os.environ.get(API_KEY_ENV) or None",
             "api_key=args.api_key or None",
             ("tests/serve/test_serve.py::test_serve_takes_the_api_key_from_the_environment",),
             "`reranker serve` with only RERANKER_API_KEY set is open to anyone"),
    Mutation("serve-max-connections-ignored", "reranker/cli/serve.py",
             "limit_concurrency=args.max_connections, ",
             "",
             ("tests/serve/test_serve.py::test_max_connections_answers_503_beyond_it",),
             "--max-connections does not limit connections"),
    Mutation("serve-no-drain", "reranker/cli/serve.py",
             "timeout_graceful_shutdown=int(settings.request_timeout) + 5)",
             "timeout_graceful_shutdown=1)",
             ("tests/serve/test_serve.py::test_sigterm_stops_listening_then_answers_the_request_it_took",),
             "SIGTERM drops the requests the server already took"),
    Mutation("serve-100-documents", "reranker/serve/settings.py",
             "max_documents: int = 1024",
             "max_documents: int = 100",
             ("tests/serve/test_serve.py::test_more_than_100_documents_up_to_max_documents",),
             "requests of more than 100 documents are refused"),
    Mutation("cohere-shape", "reranker/serve/schemas.py",
             '"results": [{"index": i, "relevance_score": scores[i]} for i in ranked(scores, req.top_n)],',
             '"results": [{"index": i, "score": scores[i]} for i in ranked(scores, req.top_n)],',
             ("tests/serve/test_serve.py::test_cohere_sdk_against_v2_rerank",),
             "/v2/rerank answers in a shape the Cohere SDK cannot read"),
    Mutation("serve-no-size-caps", "reranker/serve/app.py",
             "                check_sizes(query, sides, settings)\n",
             "",
             ("tests/serve/test_serve.py::test_caps_on_characters_prompts_and_chunks_are_checked_before_queueing",),
             "a 15 MB document or query is tokenised instead of refused"),
    Mutation("serve-image-string-as-path", "reranker/serve/prepare.py",
             '    if image.value[:5].lower() == "data:":\n        return image.value',
             "    if True:\n        return image.value",
             ("tests/serve/test_serve_images.py::test_a_path_or_file_uri_is_refused_and_never_read",),
             "a request's image string reaches the library as a path: the server reads local files for any client"),
    Mutation("serve-image-urls-passed-on", "reranker/serve/prepare.py",
             "            if fetcher is None:",
             "            if False:",
             ("tests/serve/test_serve_images.py::test_urls_are_refused_and_never_fetched",),
             "an image URL is not refused by the server itself (only the library's own refusal stands between it and a fetch)"),
    Mutation("serve-url-without-host", "reranker/serve/fetch.py",
             "if not url.raw_host:",
             "if False:",
             ("tests/serve/test_serve_image_urls.py::test_urls_outside_the_allowed_hosts_are_422_and_never_contacted",),
             "'http:host/path' (no '//') is refused as a host named '' instead of as a URL without a host"),
    Mutation("serve-image-pixel-cap-ignored", "reranker/serve/prepare.py",
             "max_pixels=settings.max_image_pixels)",
             "max_pixels=None)",
             ("tests/serve/test_serve_images.py::test_bad_and_oversized_images_are_422_naming_the_document",),
             "--max-image-pixels is not applied: the server decodes images up to the library's 2**27 pixels"),
    Mutation("serve-image-loading-not-cancelled", "reranker/serve/prepare.py",
             "    for image in images:\n        check_cancelled()\n",
             "    for image in images:\n",
             ("tests/serve/test_serve_images.py::test_image_loading_stops_at_the_request_timeout",),
             "a request's images keep being decoded after it was answered 504"),
    # Image URLs (`reranker serve --image-url-hosts`): fetched only from the operator's hosts, bounded.
    Mutation("serve-url-any-host", "reranker/serve/fetch.py",
             "if not any(rule.matches(host, port, default) for rule in self.rules):",
             "if False:",
             ("tests/serve/test_serve_image_urls.py::test_urls_outside_the_allowed_hosts_are_422_and_never_contacted",),
             "any client makes the server fetch from any host (server-side request forgery)"),
    Mutation("serve-url-redirect-unchecked", "reranker/serve/fetch.py",
             "why = self.refusal(target)",
             "why = None",
             ("tests/serve/test_serve_image_urls.py::test_redirects_are_followed_only_to_allowed_hosts_and_a_few_hops",),
             "an allowed host's redirect takes the server to any host"),
    Mutation("serve-url-httpx-follows-redirects", "reranker/serve/fetch.py",
             "follow_redirects=False, headers=_HEADERS",
             "follow_redirects=True, headers=_HEADERS",
             ("tests/serve/test_serve_image_urls.py::test_redirects_are_followed_only_to_allowed_hosts_and_a_few_hops",),
             "httpx follows redirects itself, past the policy's check of each hop"),
    Mutation("serve-url-http-without-flag", "reranker/serve/fetch.py",
             'if url.scheme == "http" and not self.http:',
             "if False:",
             ("tests/serve/test_serve_image_urls.py::test_https_is_verified_and_plain_http_needs_its_flag",),
             "plain http:// URLs (and https -> http redirects) are fetched without --image-url-http"),
    Mutation("serve-url-tls-unverified", "reranker/serve/fetch.py",
             "httpx.Client(verify=self.ssl,",
             "httpx.Client(verify=False,",
             ("tests/serve/test_serve_image_urls.py::test_https_is_verified_and_plain_http_needs_its_flag",),
             "https image hosts' certificates are not verified"),
    Mutation("serve-url-wildcard-without-dot", "reranker/serve/settings.py",
             'return host.endswith("." + self.host) if self.wildcard else host == self.host',
             "return host.endswith(self.host) if self.wildcard else host == self.host",
             ("tests/serve/test_serve_image_urls.py::test_host_rules",),
             "'*.example.com' also allows evilexample.com"),
    Mutation("serve-url-any-port", "reranker/serve/settings.py",
             "if port != (self.port if self.port is not None else default_port):",
             "if self.port is not None and port != self.port:",
             ("tests/serve/test_serve_image_urls.py::test_host_rules",),
             "a host entry without a port allows every port of that host (its other services)"),
    Mutation("serve-url-body-uncapped", "reranker/serve/fetch.py",
             "if len(body) > self.max_bytes:",
             "if False:",
             ("tests/serve/test_serve_image_urls.py::test_an_oversized_body_is_aborted_while_streaming",),
             "a download without Content-Length is read whatever its size"),
    Mutation("serve-url-no-timeout", "reranker/serve/fetch.py",
             "late = [d for d in downloads if d.future in pending and (d.deadline or deadline) < now]",
             "late = []",
             ("tests/serve/test_serve_image_urls.py::test_a_slow_host_is_given_up_at_the_timeout",),
             "the request waits for a slow host past --image-url-timeout (up to its reads' own timeouts, or forever on a drip)"),
    Mutation("serve-url-download-not-stopped", "reranker/serve/fetch.py",
             "if stop.is_set():  # the worker gave up",
             "if False:  # the worker gave up",
             ("tests/serve/test_serve_image_urls.py::test_a_slow_host_is_given_up_at_the_timeout",),
             "a download the request gave up on keeps reading from a dripping host"),
    Mutation("image-query-projected-per-prompt", "reranker/engine/scoring.py",
             "            if image not in encoded:",
             "            if True:",
             ("tests/serve/test_serve_images.py::test_an_image_query_is_projected_once_and_equals_compute_score",),
             "a request's image query is run through the vision tower once per document"),
    Mutation("serve-no-prompt-cap", "reranker/serve/app.py",
             "                    check_prompts(prepared, settings)\n",
             "",
             ("tests/serve/test_serve.py::test_caps_on_characters_prompts_and_chunks_are_checked_before_queueing",),
             "a chunking bomb queues tens of thousands of prompts"),
    Mutation("serve-disconnect-is-500", "reranker/serve/app.py",
             "        except ClientDisconnect:  # the client left mid-body",
             "        except ZeroDivisionError:  # the client left mid-body",
             ("tests/serve/test_serve.py::test_a_client_that_disconnects_mid_body_is_a_499_not_an_error",),
             "a client that leaves mid-body is logged as a server error (500 and a traceback)"),
    # Files that lie.
    Mutation("gguf-header-shapes-unchecked", "reranker/engine/identity.py",
             "    _check_shapes(layout, arch, n_embd, n_vocab)\n",
             "",
             ("tests/engine/test_fast_path.py::test_header_that_lies_about_the_hidden_size_writes_nothing",),
             "a GGUF header that lies about its hidden size writes gigabytes into the cache"),
    Mutation("npz-header-unchecked", "head/npz_format.py",
             "    _check_size(data, src, key)\n",
             "",
             ("tests/torch_head/test_head.py::test_npz_header_claiming_a_huge_array_is_refused_before_reading",),
             "a crafted .npz head allocates what its header claims"),
    Mutation("rerank-file-splitlines", "reranker/cli/rerank.py",
             'lines = [line.removesuffix("\\r") for line in text.split("\\n")]',
             "lines = text.splitlines()",
             ("tests/cli/test_cli.py::test_documents_file_lines_end_at_newline_only",),
             "a form feed or U+2028 splits a document, shifting every later index"),
    # What a new user trips on: missing extras found late, hints for another install, duplicate cache copies.
    Mutation("resume-ignores-image-files", "reranker/jobs/job.py",
             "if self._image_files_then is not None and self.image_files != self._image_files_then:",
             "if False:",
             ("tests/jobs/test_job_images.py::test_a_resume_refuses_image_files_changed_since_they_were_scored",),
             "a resume goes on after image files it scored changed: the output mixes scores of old and new pictures"),
    Mutation("image-stamp-without-time", "reranker/jobs/images.py",
             "return [st.st_size, st.st_mtime_ns]",
             "return [st.st_size]",
             ("tests/jobs/test_job_images.py::test_a_resume_refuses_image_files_changed_since_they_were_scored",),
             "an image rewritten at the same size (another picture of the same shape) is taken as unchanged"),
    Mutation("image-stamp-with-path", "reranker/jobs/images.py",
             "return [st.st_size, st.st_mtime_ns]",
             "return [str(path), st.st_size, st.st_mtime_ns]",
             ("tests/jobs/test_job_images.py::test_a_resume_refuses_image_files_changed_since_they_were_scored",),
             "a resume from another folder (the input spelt otherwise, the same files) is refused"),
    Mutation("finished-job-ignores-image-files", "reranker/jobs/job.py",
             'if state.get("image_files"):  # done, from image files: as they are now?',
             "if False:",
             ("tests/jobs/test_job_images.py::test_a_resume_refuses_image_files_changed_since_they_were_scored",),
             "a finished job says 'already done' although image files it scored have changed"),
    Mutation("ray-part-ignores-image-files", "reranker/jobs/ray_job.py",
             'if meta.num_rows != shard.pairs or kv.get(b"reranker.image_files", b"").decode() != shard.image_files:',
             "if meta.num_rows != shard.pairs:",
             ("tests/jobs/test_job_images.py::test_ray_job_with_images_equals_the_local_job",),
             "a Ray rerun keeps a part scored from image files that have changed since"),
    Mutation("job-extras-checked-late", "reranker/jobs/run.py",
             "        require_extras(spec, engine)  # the Ray engine's own checks of its flags come first\n",
             "",
             ("tests/cli/test_extras.py::test_parquet_output_without_pyarrow_fails_before_the_model_loads",),
             "score -o x.parquet without pyarrow loads the model, fails, and leaves a checkpoint behind"),
    Mutation("serve-extra-unchecked", "reranker/cli/serve.py",
             '    require("serve", "reranker serve")',
             "    pass",
             ("tests/cli/test_extras.py::test_serve_without_its_extra_names_this_install",),
             "a server without httpx starts, and fails only when an image URL arrives (or a traceback without fastapi)"),
    Mutation("extras-never-missing", "reranker/extras.py",
             '            return module.split(".")[0]\n',
             "            return None\n",
             ("tests/cli/test_extras.py::test_bench_quant_without_scipy_fails_before_scoring",),
             "bench-quant without scipy scores the whole reference before it fails"),
    Mutation("install-hint-ignores-editable", "reranker/extras.py",
             "        if folder.is_dir():\n",
             "        if False:\n",
             ("tests/cli/test_extras.py::test_install_hint_follows_the_install",),
             "an editable checkout is told to pip install the package from the index"),
    Mutation("cli-flag-without-help", "reranker/cli/rerank.py",
             'help="the query the documents are ranked for"',
             "help=None",
             ("tests/cli/test_extras.py::test_every_cli_flag_has_help",),
             "rerank -q has no help text"),
    Mutation("cache-keyed-by-mtime", "reranker/engine/identity.py",
             "    content = memo.content(src)\n",
             "    content = memo.content(src) + str(src.stat().st_mtime_ns)\n",
             ("tests/engine/test_bf16.py::test_identical_bytes_reuse_one_copy",),
             "rerunning README's first command writes a second, identical copy and orphans the first"),
    Mutation("bf16-copy-without-exact-tensors", "reranker/engine/identity.py",
             '        reencode = "bf16" if k else None',
             '        reencode = "bf16"',
             ("tests/engine/test_bf16.py::test_bf16_copy_without_an_exact_tensor_is_the_plain_copy",),
             "a BF16 copy in which no tensor was re-encoded duplicates the F16 copy"),
    Mutation("threads-from-load-average", "reranker/engine/cpu.py",
             "    busy = _busy_now(frozenset(cpus))\n",
             "    busy = None\n",
             ("tests/engine/test_bf16.py::test_default_threads",),
             "the thread default follows the 1-minute load average, which still counts a job that just ended"),
    Mutation("k-quant-fallbacks-unexplained", "reranker/bench/quant.py",
             '    _warn_k_quant_misfits(ref.path, [n for n in names if "_K" in n])\n',
             "",
             ("tests/bench/test_k_quant_fit.py::test_bench_plan_warns_once_before_anything_is_made",),
             "bench-quant on the tiny model prints a degenerate table without saying why"),
    Mutation("k-quant-fallback-lines-at-warning", "reranker/llama_log.py",
             "            _last_level[0] = logging.DEBUG\n            if _fallbacks is not None:",
             "            if _fallbacks is not None:",
             ("tests/bench/test_k_quant_fit.py::test_quantize_says_why_in_one_line",),
             "llama.cpp's two warning lines per tensor flood a K-quant of the tiny model (~80 lines per bench)"),
    # Images: loaded, sized and encoded as the original (tests/images/).
    Mutation("image-exif-ignored", "reranker/images/load.py",
             "        im = ImageOps.exif_transpose(im)\n",
             "",
             ("tests/images/test_load.py::test_exif_orientation_is_applied",),
             "a phone photo reaches the model on its side"),
    Mutation("image-bomb-warning", "reranker/images/load.py",
             'warnings.simplefilter("ignore", Image.DecompressionBombWarning)',
             "pass",
             ("tests/images/test_load.py::test_pils_warning_band_is_not_a_warning",),
             "PIL's decompression-bomb warning leaks out beside our limit"),
    Mutation("image-round-half-up", "reranker/images/preprocess.py",
             "h_bar = round(height / f) * f",
             "h_bar = math.floor(height / f + 0.5) * f",
             ("tests/images/test_preprocess.py::test_sizes_equal_transformers_smart_resize",),
             "C rounding (llama.cpp's) instead of Python's: ties like 70 px get another size than the original's"),
    Mutation("image-bilinear", "reranker/images/preprocess.py",
             "image.resize((w, h), Image.Resampling.BICUBIC)",
             "image.resize((w, h), Image.Resampling.BILINEAR)",
             ("tests/images/test_preprocess.py::test_pixels_equal_the_pil_processors",),
             "another resampling filter than the original's PIL bicubic"),
    Mutation("mtmd-default-token-limits", "reranker/images/encode.py",
             "        params.image_min_tokens = sizing.min_tokens\n",
             "",
             ("tests/images/test_encode.py::test_embeddings_equal_transformers",),
             "libmtmd keeps its own minimum (8 tokens) and resizes small images itself"),
    Mutation("mmproj-f32-fused-attention", "reranker/images/encode.py",
             'flash_attn = header_value(self.path, "general.file_type") != 0',
             "flash_attn = True",
             ("tests/images/test_encode.py::test_an_f32_projector_runs_unfused_attention",),
             "an F32 projector's attention rounds Q, K and V to F16 (libmtmd's auto turns fused attention on)"),
    Mutation("mrope-x-y-swapped", "reranker/images/encode.py",
             "rel[:, i] = (d.t, d.y, d.x, d.z)",
             "rel[:, i] = (d.t, d.x, d.y, d.z)",
             ("tests/images/test_encode.py::test_positions_equal_transformers_rope_index",),
             "image tokens get (column, row) positions where the backbone was trained on (row, column)"),
    Mutation("mmproj-dim-unchecked", "reranker/images/encode.py",
             "    if dim != n_embd:",
             "    if False:",
             ("tests/images/test_encode.py::test_header_checks_name_the_file_and_the_fix",),
             "a projector for another backbone fails later, in libmtmd's log, not with a clear error"),
    # A server under hostile load (tests/serve/test_serve.py).
    Mutation("serve-cancelled-is-500", "reranker/serve/app.py",
             "        except asyncio.CancelledError:",
             "        except KeyboardInterrupt:",
             ("tests/serve/test_serve.py::test_a_handler_cancelled_at_shutdown_answers_503_not_a_500_traceback",),
             "a SIGTERM during a request answers it 500 with a CancelledError traceback"),
    Mutation("tokenize-cancel-ignored", "reranker/engine/tokenizer.py",
             "    event = CANCEL.get()\n",
             "    event = None\n",
             ("tests/serve/test_serve.py::test_huge_and_bomb_requests_do_not_starve_small_ones",),
             "a huge document keeps burning CPU after its client gave up (tokenising is not cancelled)"),
    # Image pairs through the engine (tests/engine/test_segments.py, tests/api/test_images.py).
    Mutation("image-grid-transposed", "reranker/engine/vision.py",
             "Embeddings(e.embeddings, nx=e.nx, ny=e.ny)",
             "Embeddings(e.embeddings, nx=e.ny, ny=e.nx)",
             ("tests/api/test_images.py::test_image_documents_equal_the_original",),
             "a tall image's rows get a wide image's positions"),
    Mutation("text-after-image-at-its-token-count", "reranker/engine/segments.py",
             "        return max(self.nx, self.ny)\n",
             "        return len(self.rows)\n",
             ("tests/engine/test_segments.py::test_image_rows_at_mrope_positions_equal_transformers",),
             "the text after an image continues one position per image token, not at +max(nx, ny) as transformers"),
    # The suite's own rule: in CI a missing test extra fails instead of skipping.
    Mutation("extras-may-skip", "tests/conftest.py",
             "    pytest.importorskip = _importorfail",
             "    pass",
             ("tests/test_suite_rules.py",),
             "a missing optional package silently skips whole modules in CI"),
    # The vision projector: llama.cpp's file, computing transformers' vision tower (issue 19).
    Mutation("mmproj-qk-swapped", "reranker/gguf/mmproj.py",
             'enumerate(("q", "k", "v"))',
             'enumerate(("k", "q", "v"))',
             ("tests/gguf/test_mmproj.py::test_same_file_as_llama_cpp_record",
              "tests/gguf/test_mmproj.py::test_mtmd_encodes_an_image_as_transformers"),
             "the fused qkv is split in the wrong order: attention reads keys as queries"),
    Mutation("mmproj-patch-halves-swapped", "reranker/gguf/mmproj.py",
             'return [(base, out, (slice(None), slice(None), 0)), (base + ".1", out, (slice(None), slice(None), 1))]',
             'return [(base, out, (slice(None), slice(None), 1)), (base + ".1", out, (slice(None), slice(None), 0))]',
             ("tests/gguf/test_mmproj.py::test_same_file_as_llama_cpp_record",),
             "the Conv3D's temporal slices are swapped (a still image hides it; only the bytes show it)"),
    Mutation("mmproj-mean-not-read", "reranker/gguf/mmproj.py",
             'w.add_vision_image_mean(list(pre["image_mean"]))',
             "w.add_vision_image_mean([0.5, 0.5, 0.5])",
             ("tests/gguf/test_mmproj.py::test_same_file_as_llama_cpp_record",
              "tests/gguf/test_mmproj.py::test_mtmd_encodes_an_image_as_transformers"),
             "pixels are normalised with another mean than the checkpoint's preprocessor_config.json"),
    Mutation("folder-picks-mmproj", "reranker/gguf/hub.py",
             "    ggufs = [p for p in ggufs if not is_mmproj(p)]\n",
             "",
             ("tests/gguf/test_mmproj.py::test_a_folder_resolves_to_the_language_model_not_the_projector",),
             "a folder holding <name>-F16.gguf and mmproj-<name>-F16.gguf cannot be loaded"),
    Mutation("pdf-first-page-always", "reranker/images/pdf.py",
             "pdf_page = doc[page - 1]",
             "pdf_page = doc[0]",
             ("tests/api/test_pdf.py::test_pages_render_at_the_models_size_and_show_the_page",
              "tests/api/test_pdf.py::test_a_page_scores_as_its_render_and_rank_ranks_pages"),
             "every {\"pdf\": path, \"page\": n} document is scored as the file's first page"),
    Mutation("pdf-encryption-unnamed", "reranker/images/pdf.py",
             "if code in (raw.FPDF_ERR_PASSWORD, raw.FPDF_ERR_SECURITY):",
             "if code in ():",
             ("tests/api/test_pdf.py::test_broken_encrypted_and_missing_pages_are_named",),
             "a password-protected PDF is reported as an unreadable file, not as encrypted"),
    # PDF pages in jobs and the GPU run's job on image documents (tests/jobs/test_job_pdf.py, issue 20).
    Mutation("pdf-stale-last-error", "reranker/images/pdf.py",
             'pdfium.raw.FPDF_LoadDocument(b"", None)',
             "pass",
             ("tests/api/test_pdf.py::test_broken_encrypted_and_missing_pages_are_named",),
             "an empty PDF read after an encrypted one is reported as encrypted (PDFium's last error is stale)"),
    Mutation("job-pdf-page-ignored", "reranker/jobs/images.py",
             "image = pdfs.render(doc.source, doc.page, name)",
             "image = pdfs.render(doc.source, 1, name)",
             ("tests/jobs/test_job_pdf.py::test_pdf_job_equals_compute_score",),
             "a score job renders the first page of a PDF whatever page its document names"),
    Mutation("job-pdf-pages-share-an-index", "reranker/jobs/readers.py",
             "        k += 1\n    return k\n",
             "    return k + 1\n",
             ("tests/jobs/test_job_pdf.py::test_readers_expand_whole_pdfs_and_name_pages",),
             "the pages of a whole PDF in a job share one document index (outputs and rejects point at the wrong documents)"),
    Mutation("job-pdf-opened-by-path", "reranker/jobs/images.py",
             "        with open_pdf_file(path) as f:\n            try:\n                n = page_count(path, f)",
             "        if True:\n            try:\n                n = page_count(path)",
             ("tests/jobs/test_job_pdf.py::test_readers_expand_whole_pdfs_and_name_pages",),
             "a job counts a PDF's pages through its path, not the opener that refuses fifos, devices and oversized files"),
    Mutation("job-pdf-page-cap-lifted", "reranker/jobs/images.py",
             "if n > MAX_PAGES:",
             "if n > 2 * MAX_PAGES:",
             ("tests/jobs/test_job_pdf.py::test_readers_expand_whole_pdfs_and_name_pages",),
             "a whole PDF in a job expands past the pdf module's page cap"),
    # Issue 20's gaps: one open per PDF and window, PDFs as bytes, a `pdf` column for Ray Data's callable.
    Mutation("job-pdf-reopened-per-page", "reranker/images/pdf.py",
             "entry = self._docs.pop(key, None)",
             "entry = None",
             ("tests/jobs/test_job_pdf.py::test_a_window_opens_each_pdf_once",),
             "a job opens (and parses) a PDF again for every page of a window it renders"),
    Mutation("api-pdf-reopened-per-page", "reranker/api.py",
             "loaded[id(x.source)] = load(x, sizing, pdfs=pdfs)",
             "loaded[id(x.source)] = load(x, sizing)",
             ("tests/api/test_pdf.py::test_one_call_opens_each_pdf_once",),
             "the API opens (and parses) a PDF again for every page of a batch"),
    Mutation("job-pdf-left-open", "reranker/images/pdf.py",
             "    def close(self) -> None:\n        while self._docs:",
             "    def close(self) -> None:\n        while False:",
             ("tests/jobs/test_job_pdf.py::test_a_window_opens_each_pdf_once",),
             "a window's PDF documents and files stay open after its pages are rendered"),
    Mutation("pdf-documents-unbounded", "reranker/images/pdf.py",
             "while len(self._docs) >= self._keep:",
             "while False:",
             ("tests/jobs/test_job_pdf.py::test_pdf_documents_keep_a_bounded_number_open",),
             "a record naming thousands of PDF files keeps them all open at once (descriptors, parsed tables)"),
    Mutation("job-pdf-bytes-refused", "reranker/jobs/readers.py",
             "    if isinstance(value, (bytes, bytearray)):\n        if not value:\n            raise _Bad(f'bad PDF:",
             "    if False:\n        if not value:\n            raise _Bad(f'bad PDF:",
             ("tests/jobs/test_job_pdf.py::test_readers_take_pdf_bytes",),
             "a Parquet binary `pdf` column is rejected as not a path"),
    Mutation("job-pdf-bytes-size-cap-lifted", "reranker/jobs/readers.py",
             "if len(value) > MAX_FILE_BYTES:  # the cap of a PDF file",
             "if False:  # the cap of a PDF file",
             ("tests/jobs/test_job_pdf.py::test_readers_take_pdf_bytes",),
             "a PDF given as bytes escapes the size cap of a PDF file"),
    Mutation("job-pdf-bytes-pages-share-an-id", "reranker/jobs/readers.py",
             "doc_id = pages[0].given if pages[0].given is not None else str(k)",
             "doc_id = pages[0].given",
             ("tests/jobs/test_job_pdf.py::test_readers_take_pdf_bytes",),
             "the pages of a whole PDF given as bytes without an id are named None#1, None#2, ..."),
    Mutation("ray-pdf-page-ignored", "reranker/jobs/ray_data.py",
             "return ImageRef(pdfs.render(row.source, page, ref.name), ref.name)",
             "return ImageRef(pdfs.render(row.source, 1, ref.name), ref.name)",
             ("tests/jobs/test_job_pdf.py::test_ray_callable_scores_pdf_columns",),
             "Ray Data's callable scores the first page of a PDF whatever its row's page"),
    Mutation("ray-pdf-page-guessed", "reranker/jobs/ray_data.py",
             "        if n != 1:",
             "        if False:",
             ("tests/jobs/test_job_pdf.py::test_ray_callable_scores_pdf_columns",),
             "a row naming a PDF of several pages without a page is scored as its first page, silently"),
    Mutation("gpu-job-images-check-not-counted", "benchmarks/gpu/report.py",
             "for s in CHECK_STEPS + OPTIONAL_CHECK_STEPS:",
             "for s in CHECK_STEPS:",
             ("tests/benchmarks/test_gpu_harness.py::test_job_images_figures_and_check_reach_results_md_and_the_summary",),
             "the GPU run's job on image documents can differ from compute_score and the run still exits 0"),
    Mutation("bench-mmproj-not-passed", "reranker/bench/worker.py",
             'bf16=False, mmproj=spec.get("mmproj"))',
             "bf16=False)",
             ("tests/bench/test_bench_quant.py::test_projector_levels_are_made_and_measured",),
             "every projector level of bench-quant is measured with the projector beside the model, not its own"),
    Mutation("hub-text-download-takes-projectors", "reranker/gguf/hub.py",
             "return allow, [MMPROJ_PATTERN, MMPROJ_PATTERN.upper()]",
             "return allow, []",
             ("tests/gguf/test_hub.py::test_text_download_leaves_projectors_out",),
             "text-only use of repo:Q8_0 also downloads mmproj-...-Q8_0.gguf (0.6 GB for m0)"),
    Mutation("hub-projector-unreachable-no-cache-fallback", "reranker/gguf/hub.py",
             "            unreachable = e\n",
             "            raise\n",
             ("tests/gguf/test_hub.py::test_hub_projector_when_the_hub_is_unreachable",),
             "without a network the cached projector of a Hub model is not used, and the error is not a RerankerError"),
    Mutation("hub-projector-not-fetched", "reranker/api.py",
             "path = mmproj_from_hub(self.hub_source) if self.hub_source else find_mmproj(self.gguf_source)",
             "path = find_mmproj(self.gguf_source)",
             ("tests/gguf/test_hub.py::test_hub_model_without_projector_fails_on_the_first_image_only",),
             "a Hub model's projector is only looked for in the cached snapshot, never downloaded"),
    Mutation("gpu-build-without-libmtmd", "benchmarks/gpu/run.py",
             'MTMD_BUILD_ARGS = ["-DLLAVA_BUILD=ON"]',
             'MTMD_BUILD_ARGS = ["-DLLAVA_BUILD=OFF"]',
             ("tests/benchmarks/test_gpu_harness.py::test_both_build_routes_give_libmtmd",),
             "the GPU run's build has no libmtmd again: the images step skips"),
    Mutation("gpu-mtmd-pack-unchecked", "benchmarks/gpu/run.py",
             "if got != entry.get(\"sha256\"):",
             "if False:",
             ("tests/benchmarks/test_gpu_harness.py::test_carried_libmtmd_goes_beside_the_prebuilt_libraries",),
             "a damaged carried libmtmd is unpacked beside the prebuilt libraries"),
    Mutation("gpu-mtmd-may-need-cuda", "benchmarks/gpu/prepare.py",
             "foreign = needed - MTMD_NEEDED - MTMD_RUNTIME",
             "foreign = set()",
             ("tests/benchmarks/test_gpu_harness.py::test_mtmd_pack_verification",),
             "a libmtmd that needs CUDA libraries of its own (which the GPU machine may lack) is carried"),
    # Image documents in jobs (tests/jobs/test_job_images.py, issue 20).
    Mutation("job-image-not-regular-file", "reranker/jobs/images.py",
             "        if not stat.S_ISREG(st.st_mode):\n",
             "        if False:\n",
             ("tests/jobs/test_job_images.py::test_bad_images_are_rejected_alone",),
             "a job opens a folder, fifo or device named as an image (a hang or a huge read) instead of rejecting it"),
    Mutation("job-image-positions-lost", "reranker/jobs/images.py",
             "positions = [item.position(i) for i in good] if bad or item.positions is not None else None",
             "positions = None",
             ("tests/jobs/test_job_images.py::test_bad_images_are_rejected_alone",),
             "after a bad image the record's other documents are written under the wrong input indices"),
    Mutation("job-vision-not-fingerprinted", "reranker/jobs/run.py",
             '        fingerprint["vision"] = images.fingerprint(file_fingerprint(mmproj))\n',
             "        pass\n",
             ("tests/jobs/test_job_images.py::test_fingerprint_covers_the_projector",),
             "a resume with another projector mixes two models' image scores in one output"),
    Mutation("job-window-images-unbounded", "reranker/jobs/job.py",
             "if units and isinstance(item, Unit) and images + image_count(item) > WINDOW_IMAGES:",
             "if False:",
             ("tests/jobs/test_job_images.py::test_a_window_holds_at_most_window_images_images",),
             "a record that would take its window past WINDOW_IMAGES images joins it anyway"),
    Mutation("synth-vision-moves-head", "reranker/synth/random_checkpoint.py",
             "head = _score_head(p, seed, calib.last_hidden(norm.float()), dt)",
             "head = _score_head(p, seed + int(vision), calib.last_hidden(norm.float()), dt)",
             ("tests/synth/test_synth.py::test_vision_false_leaves_the_text_tensors_as_they_are",
              "tests/gguf/test_mmproj.py::test_language_model_file_unchanged_by_the_vision_tower"),
             "adding the vision tower changes the text model's files (existing GGUFs would move)"),
]


def copy_tree(dest: Path) -> None:
    """The working tree's tracked and untracked (not ignored) files, as they are now."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def apply(tree: Path, m: Mutation) -> str | None:
    """Apply `m` in `tree`; None, or why it cannot be applied (stale)."""
    path = tree / m.file
    if not path.exists():
        return f"{m.file} does not exist"
    text = path.read_text(encoding="utf-8")
    count = text.count(m.original)
    if count != 1:
        return f"the original text occurs {count} times in {m.file}"
    path.write_text(text.replace(m.original, m.mutated), encoding="utf-8")
    return None


def run_one(m: Mutation, pytest_args: list[str]) -> tuple[str, float, str]:
    """(outcome, seconds, detail) for one mutation: caught, survived, stale or error."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        stale = apply(tree, m)
        if stale:
            return "stale", 0.0, stale
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *pytest_args, *m.tests]
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t
    out = proc.stdout + proc.stderr
    if proc.returncode == 1:  # tests failed: the mutation was seen
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
        return "caught", seconds, failed[0] if failed else "failed"
    if proc.returncode == 0:
        return "survived", seconds, out.strip().splitlines()[-1] if out.strip() else ""
    # 2: interrupted or collection error, 3: internal error, 4: usage, 5: nothing collected: no verdict
    return "error", seconds, f"pytest exit {proc.returncode}: " + " | ".join(out.strip().splitlines()[-3:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="mutations to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--pytest-args", default="", help='extra pytest arguments, e.g. "-m \'not slow\'"')
    args = p.parse_args(argv)
    known = {m.name: m for m in MUTATIONS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        p.error(f"unknown mutation(s) {', '.join(unknown)}; --list shows them")
    chosen = [known[n] for n in args.names] if args.names else MUTATIONS
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.file}: {m.why}\n    tests: {' '.join(m.tests)}")
        return 0
    import shlex

    results = []
    for m in chosen:
        outcome, seconds, detail = run_one(m, shlex.split(args.pytest_args))
        results.append(outcome)
        print(f"{outcome:8} {m.name:32} {seconds:6.0f} s  {detail}", flush=True)
    caught = results.count("caught")
    print(f"{caught} of {len(results)} mutations caught")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
