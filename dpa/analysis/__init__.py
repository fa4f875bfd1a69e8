"""What DPA does to a model and its data: per-token visual relevance
(:mod:`dpa.analysis.relevance`) and the language-prior-conflict diagnostic
(:mod:`dpa.analysis.prior`)."""
