from recloop.cli import main

main()
