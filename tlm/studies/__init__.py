"""Studies: the ablation runner and its report (analysis, decision rules, figures), statistics, and the speed
benchmark."""
