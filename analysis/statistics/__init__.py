"""Everything computed from the entropy tables: layer, head, cross-family, language, training-stage and robustness statistics, and the selections the report shows."""
