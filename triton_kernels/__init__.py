"""fastdfa's Triton kernels, one op per file (kernel, host launcher, PyTorch reference side by side).

    dfa_project   all sites' deltas ``(e @ F_s^T) * g'(a_s)`` in ONE launch
    dfa_wgrad     all layers' ``dW = delta^T h``, ``db = sum(delta)`` as ONE grouped GEMM launch
    jvp_linear    primal and tangents of ``g(x W^T + b)`` through ONE GEMM, activation state saved
    align_step    GrAPE's feedback step for all sites (column cosines, step, normalisation), J_hat never stored

The repository keeps these under ``triton_kernels/`` (docs/design.md section 3);
``python/fastdfa/triton_kernels`` links here, so they import as
``fastdfa.triton_kernels`` from a source checkout, an editable install and a
wheel alike. Importing this package imports triton: fastdfa itself only does
so when the triton backend is used (``fastdfa.backends``). On a CPU the kernels
run under ``TRITON_INTERPRET=1`` (set before this package is imported).
"""
