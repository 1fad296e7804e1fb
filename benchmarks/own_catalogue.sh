#!/usr/bin/env bash
# deepz-compare on a real catalogue that is not one of the presets, typed as a user would (issue 16):
# VVDS-deep (../shared/data/zcosmos_vvds/vvds_deep_veryreliable.csv: CFHTLS ugriz MAG_AUTO with -99.9 / 99.99
# markers, spec-z 0-4.54), its own column names, a random 30% held out, the deep estimators, FlexZBoost,
# BPZ with non-LSST curves and the four peers. RAIL ships no CFHT MegaCam curves: HSC g,r,i,z and LSSTCam u
# stand in for BPZ, so BPZ's row tests the plumbing, not BPZ.
# Writes benchmarks/results/own_catalogue_vvds.md (table, command, commit, machine, date).
set -euo pipefail
cd "$(dirname "$0")/.."
data="${DEEPZ_SHARED_DATA:-../shared/data}/zcosmos_vvds/vvds_deep_veryreliable.csv"
[ -f "$data" ] || { echo "no $data: skipped" >&2; exit 0; }
out="${1:-out/own_catalogue_vvds}"
bands=MAG_AUTO_U,MAG_AUTO_G,MAG_AUTO_R,MAG_AUTO_I,MAG_AUTO_Z
cmd=(deepz-compare --train "$data" --bands "$bands" --err-bands "${bands//MAG_AUTO/MAGERR_AUTO}"
     --redshift-col ds_spectra.Z --id-col ds_spectra.NUM --nondetect-val 99.99,-99.9
     --bpz-filters lsstcam_u,hsc_g,hsc_r,hsc_i,hsc_z
     --estimators nnc,lstm,embed,flexzboost,bpz,knn,dnf,gpz,cmnn --exclude-bad --out "$out" --markdown --quiet)
start=$(date +%s)
"${cmd[@]}" 2>&1 | tee "$out.log" | grep '^|' > "$out.table.md"
res=benchmarks/results/own_catalogue_vvds.md
{
  echo "# deepz-compare on VVDS-deep with its own column names (\`benchmarks/own_catalogue.sh\`)"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src || echo +dirty),"
  echo "$(uname -srm), $(nproc) CPUs, 1-min load at start $(cut -d' ' -f1 /proc/loadavg); wall $(( $(date +%s) - start )) s."
  echo "Data: VVDS-deep very reliable spec-z (6,140 objects, z 0-4.54), CFHTLS ugriz; test = random 30 % (seed 0)."
  echo "BPZ uses HSC g,r,i,z + LSSTCam u curves in place of CFHT MegaCam (not shipped by RAIL): a plumbing check."
  echo "Rows with a non-finite PDF are excluded (--exclude-bad) and counted in n_bad_pdf."
  echo
  echo '```'
  echo "${cmd[*]}"
  echo '```'
  echo
  cat "$out.table.md"
} > "$res"
cat "$res"
