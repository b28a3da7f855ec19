# Tandem: `make live` (set up + desktop app), `make test` (set up + whole test suite).
# Set-up is idempotent: stamps skip what is already done.

PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
# live/serve/replay: espeak-ng (the demo scene's questions), PortAudio, ffmpeg (Gradio's media).
APT_PKGS := espeak-ng libportaudio2 ffmpeg
# data and tests only: more question voices, the browser, a virtual sound card, sox.
APT_DEV_PKGS := flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts chromium pulseaudio pulseaudio-utils libasound2-plugins sox
PYTEST_ARGS ?=

.PHONY: setup setup-dev system system-dev live serve test bench clean-setup

system:
	@bash scripts/system_packages.sh $(APT_PKGS)

system-dev:
	@bash scripts/system_packages.sh $(APT_PKGS) $(APT_DEV_PKGS)

$(VENV)/.stamp-runtime: requirements.txt
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	@touch $@

$(VENV)/.stamp-dev: requirements-dev.txt $(VENV)/.stamp-runtime
	$(VPY) -m pip install -q -r requirements-dev.txt
	@touch $@

setup: system $(VENV)/.stamp-runtime
setup-dev: system-dev $(VENV)/.stamp-dev

live: setup
	$(VPY) run.py live

serve: setup
	$(VPY) run.py serve

test: setup-dev
	$(VPY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(VPY) run.py bench

clean-setup:
	rm -rf $(VENV)
