python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
mkdir -p /tmp/site/xprof/cli && touch /tmp/site/xprof/__init__.py /tmp/site/xprof/cli/__init__.py && echo 'get_kernel_stats_tool = None' > /tmp/site/xprof/cli/tools.py
export PYTHONPATH=/tmp/site:$PWD
