"""The site: data loading and checks, local training and evaluation, the ClientApp."""
