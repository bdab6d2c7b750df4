"""Running a model under a budget: model loading (`models`), block-wise prefill (`prefill`),
sessions (`session`, their answers `answer` and chat rendering `template`; EpiCache's episodic
ones: `episodic`), session files (`sessionfile`) and static (CUDA-graph) decoding (`decoder`,
`static`, `static_store`). The package namespace holds the modules only: `kvbudget` exports their
public names."""
