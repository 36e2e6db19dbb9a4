#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what a GPU machine of this workplace lacks, for tools/gpu_session.sh:
# wheels of the pure-Python packages the checks and the starter's training import (its image has
# torch, NumPy, SciPy, scikit-image and filelock, but not MONAI, nibabel or pydicom), and the subset
# of ../shared/data they read: the starter's training cases, the GPU check's cases, the fitting
# probes' round. The held-out cases stay here unless CASES names them: their figures are taken back
# on this machine. About 41 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
PY=${PY:-.venv/bin/python}
rm -rf .gpu
mkdir -p .gpu/wheels .gpu/data/sts .gpu/data/totalseg
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/wheels \
  monai==1.6.1 nibabel==5.4.2 pydicom==2.4.4 pynrrd==1.1.3
# the starter's sarcoma cases (lib.trainers.corpus.SARCOMA_STARTER), the first five labels of the
# learning curve (bench/fit_own_labels.py's default round) and the GPU check's STS_021; CASES
# replaces them (e.g. the probes' round and held-out cases alone: the carry holds 64 MiB in all)
CASES=${CASES:-STS_001 STS_002 STS_003 STS_004 STS_005 STS_006 STS_007 STS_008 STS_009 STS_010 STS_021}
for case in $CASES; do
  cp "$DATA/sts/${case}_ct.nii.gz" "$DATA/sts/${case}_gtv.nii.gz" .gpu/data/sts/
done
cp "$DATA/totalseg/example_ct.nii.gz" "$DATA/totalseg/example_seg_fast_force_split.nii.gz" .gpu/data/totalseg/
cp "$DATA/vista3d_labels.json" .gpu/data/ 2>/dev/null || true
du -sh .gpu
