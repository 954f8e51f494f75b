"""Offline teacher cache: run the teacher once over a tokenized dataset, train students from disk.

Running a large teacher at every training step dominates the cost of white-box distillation; MiniPLM
(Gu et al. 2024, "MiniPLM: Knowledge Distillation for Pre-Training Language Models", arXiv:2410.17215)
and DistillKit do teacher inference once, offline. This package stores, for every position of every
training block, what the teacher predicts, and serves it back as the trainer's teacher.

Four kinds of content (``mode`` in the plan and manifest; absent = ``topk``):

* ``lowrank`` (the ``lmdistill cache-teacher`` default): the teacher's final hidden state on its k principal
  directions, int8 codes and one scale per position, plus ``projection.safetensors`` (the directions and
  the teacher's output layer projected onto them). Training gets *dense* teacher logits back, so every
  objective accepts it at any temperature; its fidelity (held-out KL) is measured at build time and stored
  in the manifest. See :mod:`~lmdistill.teachers.cache.projection`.
* ``topk``: the k most likely tokens' log-probabilities and the log of the mass left outside them, served as a
  :class:`~lmdistill.losses.SparseTeacher`. Every objective accepts it, but it is a biased picture of the teacher
  (the student never sees the tail's shape); the residual is shared evenly (``teacher.tail: uniform``) or in
  proportion to the student's probabilities (``tail: student``).
* ``sampled``: k systematic draws from the teacher per position, stored as log(count / k) for the drawn ids
  (-inf fillers keep the ids distinct) and no residual: random-sampling KD (arXiv:2503.16870), an unbiased
  estimate of the teacher for objectives linear in its probabilities (forward KL, cross-entropy); training
  refuses other objectives. Draws are seeded per shard, so any number of processes writes the same bytes.
* ``hybrid``: the likely tokens' exact probabilities and systematic draws from the rest (threshold sampling);
  unbiased like ``sampled``, with less variance, same objectives.

A cache for a teacher with another tokenizer than the data's (the student's; vocabulary rungs 3-4) is a ``topk``
cache of the teacher's own rows (``rows: teacher``): per student block, the teacher's tokens of its text and its
top-k at each of them; training rebuilds the character-offset alignment and serves it to the cross-tokenizer
objectives (:mod:`.crosstok`, :class:`AlignedTeacherCache`).

Modules, one concern each: :mod:`.format` (a shard's byte layout), :mod:`.manifest` (names, plan, manifest,
checksums), :mod:`.extract` (the teacher's top-k / sampled / hybrid entries), :mod:`.projection` (the low-rank
projection), :mod:`.shards` (a cache directory while it is written), :mod:`.writer` (the plan, the teacher run,
shrinking), :mod:`.reader` (the shard reader shared by the modes; ``TeacherCache(path)`` opens a cache as the
class of its mode), :mod:`.sparse` and :mod:`.lowrank` (the mode classes), :mod:`.crosstok` (caches of the teacher's
own tokens), :mod:`.command` (``cache-teacher``).

Indexing
--------
The cache is indexed by (block, position) with the run's block segmentation: block i holds the
teacher's prediction at positions ``stream[i*L : i*L+L]`` (the same ``input_ids`` that
:class:`~lmdistill.data.blocks.BlockDataset` gives item i, run through the teacher as one sequence, as
a live teacher would see them). The trainer's batches carry ``block_index``, so a lookup is a gather.

Layout on disk
--------------
::

    CACHE/
      manifest.json        written last: its presence marks a cache that was complete once
      plan.json            what is being built (teacher identity and weights hash, tokenizer
                           fingerprint, data stream key, block size, k, temperature, dtypes, sharding)
      tokenizer/           the data's tokenizer (runs that name no tokenizer use it): the teacher's, or the
                           student's in a cross-tokenizer cache
      teacher_tokenizer/   (cross-tokenizer caches only) the teacher's own tokenizer
      projection.safetensors  (lowrank only) principal directions and projected output layer
      shard-00000.bin      blocks [0, N): logprobs [n, L, k] | token ids [n, L, k] | log residual [n, L]
                           (lowrank: no logprobs | int8 codes [n, L, k] | scale [n, L])
                           (cross-tokenizer: [n, T, k] | [n, T, k] | [n, T] over the teacher's rows, then its
                           ids [n, T] and their count [n]; T = the shard's longest teacher tokenization)
      shard-00000.json     that shard's size and SHA-256 (written after the .bin)
      ...

Per token: k log-probabilities in float16 (or bfloat16 / float32), k token ids in the smallest unsigned
integer type that holds the vocabulary (uint8 / uint16 / uint32), and the log of the residual mass in
the value dtype (log space keeps small residuals precise in 16 bits; -inf when k = V). The default
k = 32 with float16 and uint16 ids costs 32*2 + 32*2 + 2 = 130 bytes per token at any vocabulary up to
65,536 tokens, against 2*V bytes for dense float16 logits (65,536 bytes at V = 32k). A low-rank cache
stores k int8 codes and a float16 scale: k + 2 bytes per token (130 at its default k = 128), at any vocabulary.

Robustness: each file is written to a temporary file, flushed to disk (fsync) and renamed into place, a shard
before its checksum file; a rerun with the same plan skips every shard whose checksum file exists and whose bytes
still match it and recomputes the others, also in a finished cache (so deleting a damaged shard and rerunning
repairs it). Several processes (``torchrun``) each take the shards ``s`` with ``s % world_size == rank``; the
output does not depend on the number of processes because every shard is computed from the same blocks in the
same forward batches. Readers refuse a manifest naming files outside the cache directory, memory-map the shards
and verify their sizes and checksums before use; a cache whose manifest does not match the run's data stream,
tokenizer or block size is refused with what differs and how to fix it.
"""

from lmdistill.teachers.cache.crosstok import AlignedTeacherCache
from lmdistill.teachers.cache.extract import hybrid_split, teacher_hybrid, teacher_sampled, teacher_top_k
from lmdistill.teachers.cache.format import VALUE_DTYPES, ShardLayout, decode_shard, encode_shard, index_dtype
from lmdistill.teachers.cache.lowrank import LowRankTeacherCache
from lmdistill.teachers.cache.manifest import (
    CACHE_FORMAT,
    CACHE_KIND,
    CACHE_MODES,
    MANIFEST_NAME,
    PLAN_NAME,
    SAMPLING_MODES,
    TEACHER_TOKENIZER_DIR,
    TOKENIZER_DIR,
    file_sha256,
    model_weights_sha256,
    plan_content_sha256,
    plan_differences,
    read_manifest,
)
from lmdistill.teachers.cache.reader import LOGITS_DTYPES, TeacherCache, VerifyMode, cache_tokenizer, open_teacher_cache
from lmdistill.teachers.cache.shards import CacheDirectory, remove_partial_files
from lmdistill.teachers.cache.sparse import SparseTeacherCache
from lmdistill.teachers.cache.writer import WriteReport, build_plan, shrink_teacher_cache, write_teacher_cache

__all__ = [
    "AlignedTeacherCache",
    "CACHE_FORMAT",
    "CACHE_KIND",
    "CACHE_MODES",
    "CacheDirectory",
    "LOGITS_DTYPES",
    "LowRankTeacherCache",
    "MANIFEST_NAME",
    "PLAN_NAME",
    "SAMPLING_MODES",
    "ShardLayout",
    "SparseTeacherCache",
    "TEACHER_TOKENIZER_DIR",
    "TOKENIZER_DIR",
    "TeacherCache",
    "VALUE_DTYPES",
    "VerifyMode",
    "WriteReport",
    "build_plan",
    "cache_tokenizer",
    "decode_shard",
    "encode_shard",
    "file_sha256",
    "hybrid_split",
    "index_dtype",
    "model_weights_sha256",
    "open_teacher_cache",
    "plan_content_sha256",
    "plan_differences",
    "read_manifest",
    "remove_partial_files",
    "shrink_teacher_cache",
    "teacher_hybrid",
    "teacher_sampled",
    "teacher_top_k",
    "write_teacher_cache",
]
