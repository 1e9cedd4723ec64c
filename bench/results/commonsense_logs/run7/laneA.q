ia3_lr7.5e-3|python bench/quality.py --task commonsense --threads 1 --methods ia3 --lr ia3=7.5e-3 --json bench/results/commonsense_grid_ia3_lr7.5e-3.json
prop_k15_lr5e-4|python bench/quality.py --task commonsense --threads 1 --methods prop_k15 --lr prop_k15=5e-4 --json bench/results/commonsense_grid_prop_k15_lr5e-4.json
