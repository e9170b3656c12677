from marche.cli import main

main()
