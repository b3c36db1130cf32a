"""Linear-attention ops: pure-torch references beside fla dispatch on CUDA. Public API for plugins.

Variant plugins build on these modules (import the names from them; this package re-exports nothing):

- :mod:`hybridize.ops.delta_rule`: ``gated_delta_rule`` (the op: ``mode`` chunk / recurrent,
  ``backend`` auto / torch / fla), ``chunk_gated_delta_rule_torch`` (exact chunked torch form) and
  ``naive_recurrent_gated_delta_rule`` (the reference loop);
- :mod:`hybridize.ops.gla`: ``gla``, ``chunk_gla_torch``, ``naive_recurrent_gla``, likewise;
- :mod:`hybridize.ops.common`: ``Backend``, ``BACKENDS``, ``resolve_backend``, ``fla_available``,
  ``compute_dtype``, ``check_shape``, ``check_choice``, ``l2norm``, ``rms_norm``, ``gated_rms_norm``,
  ``RMSNorm``, ``GatedRMSNorm``, ``ShortConvolution``;
- :mod:`hybridize.ops.projections`: ``copy_teacher_projections``, ``project_qkv``, ``output_projection``
  (teacher weights in, q/k/v with short convolutions, gated output norm; shared by GDN and GLA).

Layout (fla's): q, k (B, T, H, K); v (B, T, H, V); state (B, H, K, V). Each op returns ``(o, state)``:
``o`` (B, T, H, V) in the input dtype, the final state in fp32 (float64 stays float64) or None. Each
naive loop takes ``(q, k, v, <gates>, scale=None, initial_state=None, output_final_state=False)``
and is what a variant's ``naive`` attribute points at; the conformance suite checks each chunked
form against it in float64 (``hybridize.testing.conformance.check_op_chunk_matches_naive``,
relative tolerance 1e-6); the project's GPU tests check fla's kernels against the torch form.

Stability: the names above and their arguments are not removed, renamed or reordered without a
release in which the old form still works and warns (``DeprecationWarning``); new arguments come
last, keyword-only, with defaults that keep today's results. Names with a leading underscore,
``common.FLA_AUX_KERNELS``, ``common.use_fla_aux`` and :mod:`hybridize.ops.decode_graphs` (CUDA
graphs for one-token decoding, used by :class:`hybridize.linear.LinearAttention`) are the engine's
own and may change. Helpers that two variants share belong here, not in either plugin.

Nothing here imports fla at module import time: ``import fla`` needs triton, which CPU-only
machines do not have.
"""
