import os
import sys

# layer_harness lives beside the tests
sys.path.insert(0, os.path.dirname(__file__))
