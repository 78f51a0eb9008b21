"""The parts of ``fastdfa.DFA`` (``fastdfa/dfa.py`` is the front that assembles them):

    sites.py       Site and the FeedbackStore (all feedback in one buffer, its state_dict keys)
    recording.py   the forward recording (the graph cut) and its order / shape / dtype checks
    output.py      the output node and the error routing (NaN policy, the one projection)
    fused.py       the kernel backends' fused route and the per-layer "why not fused" reasons
    grape_pass.py  GrAPE's dual-number pass and alignment step
"""
