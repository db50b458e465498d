from fusecache.cli import main

raise SystemExit(main())
