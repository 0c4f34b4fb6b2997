from kmim.cli import main

main()
