import sys

from dspark_trt.cli import main

sys.exit(main())
