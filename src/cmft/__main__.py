from cmft.cli import main

main()
