.PHONY: setup serve test

setup:
	scripts/setup.sh

serve:
	scripts/serve.sh

test:
	scripts/test.sh
