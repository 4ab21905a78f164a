"""The emotional-support side: ESConv data, the eight strategies, prompts and turn-level
examples, inference of both paradigms, Inferential Preference Mining, the judges, the metrics
and the Table-3 report."""
