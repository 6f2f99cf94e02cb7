"""`python -m manycast`: the command line. The lab's daemons (`manycast daemon ...`)
start without loading the rest of it, so a namespace's programs come up fast."""

import sys

if sys.argv[1:2] == ["daemon"]:
    from manycast.drivers.kernel.cli import daemon_app

    daemon_app(args=sys.argv[2:], prog_name="manycast daemon")
else:
    from manycast.cli import main

    main()
