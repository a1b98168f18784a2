# Sourced by the GPU scripts of this folder (device tool): installs the wheels carried in .wheels/ that the machine
# lacks, exports the environment the scripts run in, and sets $card (h100, h200, ...) for their output names.
if ! python3 -c "import diffusers, torchmetrics" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps .wheels/*.whl
fi
export PYTHONPATH=$PWD CI=true PYTHONUNBUFFERED=1
card=$(python3 -c "import torch, re; n = torch.cuda.get_device_name(); print(re.search(r'[HAB]\d+', n).group(0).lower())")
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
