"""The OPD-vs-SFT-vs-RLVR miniature behind examples/opd_vs_sft.py (the entry point and its command line).

plan      the plan fixed before any result: steps, cadences, evaluation sizes, claim texts, the job graph
jobs      running the jobs (training, evaluation, the regime check) in parallel single-thread processes
measure   measuring streams and pairs through weightgeo's public API
claims    one statistic, CI and verdict per claim
figures   the trajectory figures
report    report.md and report.json
"""
