"""The PyTorch definition of each op, one file per op (the kernels in ``triton_kernels/<op>.py`` and
``csrc/`` are tested against these; the torch backend runs them).

    dfa_project   every site's projected error ``(e @ F_s^T) * g_s'`` from ONE GEMM
    dfa_wgrad     every layer's ``dW = delta^T h``, ``db = sum(delta)``
    jvp_linear    primal and tangents of ``g(x W^T + b)`` with g''s saved state
    align_step    GrAPE's feedback step (column cosines, step, normalisation)
"""
