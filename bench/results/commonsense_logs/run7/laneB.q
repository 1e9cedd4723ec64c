lora_lr5e-4|python bench/quality.py --task commonsense --threads 1 --methods lora --lr lora=5e-4 --json bench/results/commonsense_grid_lora_lr5e-4.json
prop_k15_lr2e-3|python bench/quality.py --task commonsense --threads 1 --methods prop_k15 --lr prop_k15=2e-3 --json bench/results/commonsense_grid_prop_k15_lr2e-3.json
