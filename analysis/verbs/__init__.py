"""Stage code: one module per `selfref` verb (and `dvc.yaml` stage). Each reads its inputs, calls the
library in `analysis/`, and writes its outputs as one unit; none holds statistics or model code itself."""
