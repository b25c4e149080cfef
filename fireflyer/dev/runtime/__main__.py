import sys

from fireflyer.dev.runtime.kubelet import main

sys.exit(main())
