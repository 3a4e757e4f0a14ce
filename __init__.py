# Lets tests and scripts import the repository root as a package; the Hub loads the modules itself.
