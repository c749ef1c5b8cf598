from quantgate.cli import main

main()
