# cmmas: two commands do everything on a fresh clone: `make demo` and `make test`.
#
# The chain prealign -> train-reg -> train-fusion [-> train-dlf, train-unet] -> evaluate is a chain of file targets under
# $(DIR), so re-running skips what is done (and an interrupted training resumes). Each stage
# reads experiments/configs/$(EXP)/<stage>.flags; variables below override single flags.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
GPU ?= 0
TF_EXTRA := $(if $(filter 1,$(GPU)),gpu,cpu)
STAMP := $(VENV)/.installed-$(TF_EXTRA)

# oneDNN: 3-5x faster 3D convolutions on CPU; quiet TensorFlow logs.
export TF_ENABLE_ONEDNN_OPTS := 1
export TF_CPP_MIN_LOG_LEVEL := 2
export PYTHONUNBUFFERED := 1
# scripts print UTF-8 tables; do not depend on the caller's locale
export PYTHONUTF8 := 1
export MPLBACKEND := Agg

EXP ?= demo
CONFIGS := experiments/configs/$(EXP)
RUN ?= runs/$(EXP)$(if $(LABELLED),-labelled$(LABELLED))
DATA ?=
ATLAS_MOD ?= ct
TARGET_MOD ?= mr
FOLD ?= 1
# FOLD=all: no fold held out, every labelled case trains the networks (make bundle-abdomen's: the
# bundle users run on new scans); its README quotes fold 1's evaluation
FOLD_ARG := $(if $(filter all,$(FOLD)),0,$(FOLD))
LAYOUT ?=
COMPONENT ?=
SHAPE ?=
DIR := $(RUN)/$(ATLAS_MOD)2$(TARGET_MOD)/fold$(FOLD)

ATLAS_SET := $(DIR)/atlas_set/manifest.json
REG := $(DIR)/reg/model.keras
SIM := $(DIR)/fusion/simnet.keras
DLF := $(DIR)/dlf/dlf.keras
UNET := $(DIR)/unet/unet.keras
FINDER := $(DIR)/finder/finder.keras
EVAL := $(DIR)/eval/summary.json
BUNDLE := $(RUN)/bundle-$(ATLAS_MOD)2$(TARGET_MOD)

MODS := --atlas_modality=$(ATLAS_MOD) --target_modality=$(TARGET_MOD)
# The chain's learned fusions: SimNet, then Deep Label Fusion where the experiment's configs hold
# train_dlf.flags and the U-Net baseline where they hold train_unet.flags; all are evaluated and
# bundled (the bundle's default fusion is the best its evaluation measured).
LEARNED := $(SIM) $(if $(wildcard $(CONFIGS)/train_dlf.flags),$(DLF)) $(if $(wildcard $(CONFIGS)/train_unet.flags),$(UNET))
comma := ,
LEARNED_FLAG := --fusion_model=$(subst $() ,$(comma),$(strip $(LEARNED)))
SHAPE_FLAG := $(if $(SHAPE),--shape=$(SHAPE))
# LABELLED=K: every training stage uses the first K labelled training targets of TARGET_MOD only
# (in its own RUN, runs/<exp>-labelledK by default): how many labelled scans of the target
# modality a method needs.
LABELLED_FLAG := $(if $(LABELLED),--labelled_targets=$(LABELLED))

MMWHS_HELP := MM-WHS 2017 (request it at zxh.me, MM-WHS challenge): DATA must hold ct_train_1001_image.nii.gz, ct_train_1001_label.nii.gz, mr_train_1001_... (up to two folders deep)
CHAOS_HELP := CHAOS (download CHAOS_Train_Sets.zip from chaos.grand-challenge.org): DATA must hold CT/<id>/DICOM_anon + CT/<id>/Ground and MR/<id>/T2SPIR/DICOM_anon + MR/<id>/T2SPIR/Ground
ABDOMEN := $(abspath ../shared/data/abdomen-ctmr)

.PHONY: install test test-fast browser results demo clean prealign train-reg train-fusion train-dlf train-unet train-finder evaluate chain bundle \
        reproduce-mmwhs reproduce-chaos reproduce-abdomen bundle-abdomen

install: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -e ".[$(TF_EXTRA),dask]"
	touch $@

test: install
	$(PY) -m pytest -q tests

# the browser of the cohort page's rendering test (tests/test_cohort.py skips without it): Debian's
# chromium (run as root, or prefix sudo)
browser:
	command -v chromium >/dev/null || apt-get install -y -q chromium

# the quick tier: every test but the end-to-end chains marked slow (pytest.ini)
test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

# the generated tables of docs/results.md and README.md, rebuilt from the records under runs/
# (each names its commit and command; "not run at this commit" where its runs are absent)
results: | $(STAMP)
	$(PY) experiments/make_results.py --runs=runs --results=docs/results.md --readme=README.md

# ---------------------------------------------------------------------------- the chain
prealign: $(ATLAS_SET)
$(ATLAS_SET): | $(STAMP)
	$(PY) experiments/prealign.py --flagfile=$(CONFIGS)/prealign.flags --data=$(DATA) $(MODS) \
	    --fold=$(FOLD_ARG) $(if $(LAYOUT),--layout=$(LAYOUT)) $(if $(COMPONENT),--component=$(COMPONENT)) \
	    $(SHAPE_FLAG) --out=$(DIR)/atlas_set

train-reg: $(REG)
$(REG): $(ATLAS_SET)
	$(PY) experiments/train_reg.py --flagfile=$(CONFIGS)/train_reg.flags --atlas_set=$(DIR)/atlas_set $(MODS) \
	    $(SHAPE_FLAG) $(LABELLED_FLAG) --out=$(DIR)/reg

train-fusion: $(SIM)
$(SIM): $(REG)
	$(PY) experiments/train_fusion.py --flagfile=$(CONFIGS)/train_fusion.flags --atlas_set=$(DIR)/atlas_set \
	    --reg_model=$(REG) $(MODS) $(SHAPE_FLAG) $(LABELLED_FLAG) --out=$(DIR)/fusion

# DLF and the U-Net train on train-fusion's pair cache (every training atlas warped onto every
# labelled training target by the trained BiRegNet). CROSSFIT=K (the default of experiments named
# in CROSSFIT_<exp>): DLF trains instead on pairs warped by K more BiRegNets, the I-th trained
# without every K-th training target from the I-th, each target warped by the one that did not see it.
CROSSFIT_abdomen-crossfit := 2
CROSSFIT ?= $(CROSSFIT_$(EXP))
CROSSFIT_REGS := $(if $(CROSSFIT),$(foreach i,$(shell seq 0 $$(($(CROSSFIT) - 1))),$(DIR)/reg_withhold$(i)of$(CROSSFIT)/model.keras))
DLF_PAIRS := $(if $(CROSSFIT_REGS),--crossfit_models=$(subst $() ,$(comma),$(strip $(CROSSFIT_REGS))) \
    --cache=$(DIR)/dlf/pairs_crossfit,--reg_model=$(REG) --cache=$(DIR)/fusion/pairs)

$(DIR)/reg_withhold%/model.keras: $(ATLAS_SET)
	$(PY) experiments/train_reg.py --flagfile=$(CONFIGS)/train_reg.flags --atlas_set=$(DIR)/atlas_set $(MODS) \
	    $(SHAPE_FLAG) $(LABELLED_FLAG) --withhold_fold=$(subst of,/,$*) --out=$(DIR)/reg_withhold$*

train-dlf: $(DLF)
$(DLF): $(SIM) $(CROSSFIT_REGS)
	$(PY) experiments/train_dlf.py --flagfile=$(CONFIGS)/train_dlf.flags --atlas_set=$(DIR)/atlas_set \
	    $(DLF_PAIRS) $(MODS) $(LABELLED_FLAG) --out=$(DIR)/dlf

train-unet: $(UNET)
$(UNET): $(SIM)
	$(PY) experiments/train_unet.py --flagfile=$(CONFIGS)/train_unet.flags --atlas_set=$(DIR)/atlas_set \
	    --reg_model=$(REG) --cache=$(DIR)/fusion/pairs $(MODS) $(LABELLED_FLAG) --out=$(DIR)/unet

# the organ finder (experiments with train_finder.flags): trained on the atlas modality's training
# scans of the fold with random contrasts; the bundle carries it (the QC's second opinion)
train-finder: $(FINDER)
$(FINDER): | $(STAMP)
	$(PY) experiments/train_finder.py --flagfile=$(CONFIGS)/train_finder.flags --data=$(DATA) $(MODS) \
	    --fold=$(FOLD_ARG) --out=$(DIR)/finder

evaluate: $(EVAL)
$(EVAL): $(LEARNED)
	$(PY) experiments/evaluate.py --flagfile=$(CONFIGS)/evaluate.flags --atlas_set=$(DIR)/atlas_set \
	    --reg_model=$(REG) $(LEARNED_FLAG) $(MODS) --out=$(DIR)/eval

# a bundle: the fold's atlas set, its networks, bundle.json and a README.txt with the evaluation's Dice, in one
# folder for `cmmas segment --bundle`
BUNDLE_FINDER := $(if $(wildcard $(CONFIGS)/train_finder.flags),$(FINDER))
BUNDLE_SUMMARY := $(if $(filter all,$(FOLD)),$(RUN)/$(ATLAS_MOD)2$(TARGET_MOD)/fold1/eval/summary.json,$(EVAL))
BUNDLE_TRAINED := $(if $(filter all,$(FOLD)),every labelled case; Dice of fold 1,fold $(FOLD))
bundle: $(BUNDLE)/README.txt
$(BUNDLE)/README.txt: $(if $(filter all,$(FOLD)),$(LEARNED),$(EVAL)) $(BUNDLE_FINDER)
	@test -f $(BUNDLE_SUMMARY) || { echo "bundle: $(BUNDLE_SUMMARY) not found: make evaluate FOLD=1 first" >&2; exit 2; }
	$(PY) experiments/make_bundle.py --atlas_set=$(DIR)/atlas_set --reg_model=$(REG) $(LEARNED_FLAG) \
	    $(if $(BUNDLE_FINDER),--finder_model=$(BUNDLE_FINDER)) \
	    --summary=$(BUNDLE_SUMMARY) --title="cmmas $(EXP) bundle: $(ATLAS_MOD) atlases for $(TARGET_MOD) scans ($(BUNDLE_TRAINED))" \
	    --out=$(BUNDLE)

# ---------------------------------------------------------------------------- demo
$(RUN)/data/.done: | $(STAMP)
	$(PY) experiments/make_phantom.py --out $(RUN)/data --n 12 --shape 64 --preview $(RUN)/phantom_preview.png
	touch $@

demo: install $(RUN)/data/.done
	$(MAKE) --no-print-directory bundle EXP=demo DATA=$(RUN)/data RUN=$(RUN)
	@echo "demo: Dice table above; overlays: $$(ls $(DIR)/eval/overlay_*.png | head -n 3 | tr '\n' ' ')"
	@echo "demo: segment a scan with the bundle: $(VENV)/bin/cmmas segment --bundle $(BUNDLE) --target SCAN --out SEG.nii.gz"

# ---------------------------------------------------------------------------- reproduce
# SETTING=paper: the original cmmas's setting (experiments/configs/paper-<data>/: oracle crop per
# case, the original networks, schedules, augmentations and SimNet hold-out; docs/fidelity.md);
# SETTING=cmmas: our pipeline (experiments/configs/<data>/). reproduce-mmwhs and reproduce-chaos
# default to paper, reproduce-abdomen to cmmas (and takes SETTING=zero or labelmix). MM-WHS in the
# paper setting runs each structure of COMPONENTS (the original's myocardium 205 and LV 500) into
# runs/paper-mmwhs-<code>.
SETTING ?= paper
ABDOMEN_SETTING := $(if $(filter command line,$(origin SETTING)),$(SETTING),cmmas)
COMPONENTS ?= 205 500
# reproduce-abdomen's experiment per SETTING; zero: no labelled scan of the target modality
# (BiRegNet and SimNet trained on atlas-modality pairs given random contrasts, --pairs atlas_only);
# labelmix: the usual training with random contrasts mixed in (--labelmix 0.5).
ABDOMEN_EXP_paper := paper-abdomen
ABDOMEN_EXP_cmmas := abdomen
ABDOMEN_EXP_zero := abdomen-zero
ABDOMEN_EXP_labelmix := abdomen-labelmix
SETTINGS := paper cmmas
check_setting = $(if $(filter $(1),$(SETTINGS)),,$(error SETTING must be paper or cmmas, not '$(1)'))

reproduce-mmwhs:
	$(call check_setting,$(SETTING))
	@test -n "$(DATA)" && test -d "$(DATA)" || { echo "reproduce-mmwhs: set DATA=/path/to/MM-WHS; $(MMWHS_HELP)" >&2; exit 2; }
	$(if $(filter paper,$(SETTING)),set -e; for code in $(COMPONENTS); do \
	    $(MAKE) --no-print-directory _folds EXP=paper-mmwhs COMPONENT=$$code RUN=runs/paper-mmwhs-$$code; done,\
	    $(MAKE) --no-print-directory _folds EXP=mmwhs)

reproduce-chaos:
	$(call check_setting,$(SETTING))
	@test -n "$(DATA)" && test -d "$(DATA)" || { echo "reproduce-chaos: set DATA=/path/to/CHAOS_Train_Sets; $(CHAOS_HELP)" >&2; exit 2; }
	$(MAKE) --no-print-directory _folds EXP=$(if $(filter paper,$(SETTING)),paper-chaos,chaos)

reproduce-abdomen:
	$(if $(filter $(ABDOMEN_SETTING),$(SETTINGS) zero labelmix),,$(error SETTING must be paper, cmmas, zero or labelmix, not '$(ABDOMEN_SETTING)'))
	@test -d "$(ABDOMEN)" || { echo "reproduce-abdomen: $(ABDOMEN) not found (the shared real CT/MR abdomen set)" >&2; exit 2; }
	$(MAKE) --no-print-directory _folds EXP=$(ABDOMEN_EXP_$(ABDOMEN_SETTING)) DATA=$(ABDOMEN) FOLDS="$(ABDOMEN_FOLDS)"

bundle-abdomen:
	@test -d "$(ABDOMEN)" || { echo "bundle-abdomen: $(ABDOMEN) not found (the shared real CT/MR abdomen set)" >&2; exit 2; }
	set -e; for pair in ct:mr mr:ct; do \
	    $(MAKE) --no-print-directory evaluate EXP=abdomen DATA=$(ABDOMEN) ATLAS_MOD=$${pair%:*} TARGET_MOD=$${pair#*:} FOLD=1; \
	    $(MAKE) --no-print-directory bundle EXP=abdomen DATA=$(ABDOMEN) ATLAS_MOD=$${pair%:*} TARGET_MOD=$${pair#*:} FOLD=all; \
	done

FOLDS ?= 1 2 3 4
# reproduce-abdomen runs fold 1 unless FOLDS is given on the command line (the default above is
# set before any recipe runs, so it cannot serve as the "not given" test).
ABDOMEN_FOLDS := $(if $(filter command line,$(origin FOLDS)),$(FOLDS),1)
.PHONY: _folds
_folds: install
	set -e; for pair in ct:mr mr:ct; do for fold in $(FOLDS); do \
	    $(MAKE) --no-print-directory evaluate EXP=$(EXP) DATA=$(DATA) ATLAS_MOD=$${pair%:*} TARGET_MOD=$${pair#*:} FOLD=$$fold; \
	done; done
	$(PY) experiments/evaluate.py --aggregate=$(RUN) --out=$(RUN)
	$(if $(filter paper-%,$(EXP)),$(PY) experiments/evaluate.py --aggregate=$(RUN) --aggregate_grid=crop --out=$(RUN)/crop)

clean:
	rm -rf runs
