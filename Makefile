.PHONY: test demo lint bench
test:
	scripts/test.sh
demo:
	scripts/demo.sh
lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
bench:
	.venv/bin/python bench/store.py && .venv/bin/python bench/codecs.py
